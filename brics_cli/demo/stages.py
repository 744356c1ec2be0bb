"""The demo's stages: each the real command, run as a subprocess with its log; stop signals passed on."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brics_cli.errors import BricsError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"  # package data: there in a wheel install too


def demo_recipe() -> str:
    """The current directory's checkout's recipe when there is one (an edited clone runs its own),
    else the packaged preset, by name -- relative either way, so the report's commands can be retyped."""
    return "recipes/demo.yaml" if Path("recipes/demo.yaml").is_file() else "demo"


@dataclass
class Stage:
    name: str
    args: list[str]
    optional_reason: str | None = None  # set: skipped, with this reason
    result: dict[str, Any] | None = None
    seconds: float = 0.0
    status: str = "pending"  # done | skipped | failed
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def command(self) -> str:
        return "brics " + " ".join(shlex.quote(a) for a in self.args)


def plan(out: Path, quick: bool, recipe: str | None = None) -> list[Stage]:
    """The stages, with the overrides that keep everything inside `out` (and small with --quick)."""
    out = relative(out)
    shards, run = out / "shards", out / "run"
    common = [recipe or demo_recipe(), f"data.shards={shards}", f"run.dir={run}"]
    ae_quick = ["ae.train.steps=40", "ae.train.batch=8", "ae.train.sample_every=20", "ae.train.checkpoint_every=20",
                "ae.train.log_every=10", "ae.train.eval_images=32"]
    diff_quick = ["diffusion.train.steps=30", "diffusion.train.batch=16", "diffusion.train.sample_every=30",
                  "diffusion.train.checkpoint_every=30", "diffusion.train.log_every=10"]
    shard_args = ["shard", "demo", "--out", str(shards), "--workers", "2"]
    if quick:
        shard_args += ["--train-count", "256", "--val-count", "64"]
    n_samples = 16 if quick else 64
    sample_steps = ["--steps", "10"] if quick else []
    stages = [
        Stage("shard", shard_args),
        Stage("ae-train", ["ae-train", *common, *(ae_quick if quick else [])]),
        Stage("reconstruct", ["reconstruct", "--from", str(run / "ae"), "--input", str(shards), "--out", str(out / "recon"),
                              "--usage", *(["--limit", "64"] if quick else [])]),
        Stage("diffusion-train", ["diffusion-train", *common, *(diff_quick if quick else [])]),
        Stage("sample", ["sample", "--from", str(run / "diffusion"), "--num-samples", str(n_samples), "--out", str(out / "samples"),
                         *sample_steps]),
        Stage("eval-recon", ["eval", "recon", "--samples", str(out / "recon"), *lpips_flag()]),
    ]
    missing = generative_weights_missing()
    stages.append(Stage("eval-generative", ["eval", "all", "--samples", str(out / "samples"), "--ref", str(shards)],
                        optional_reason=missing))
    stages.append(Stage("nn-search", ["nn-search", "--samples", str(out / "samples"), "--ref", str(shards), "--k", "5",
                                      "--limit", "8", "--metric", "l2", "--out", str(out / "nn")]))
    return stages


def relative(path: Path) -> Path:
    """`path` relative to the current directory when it lies below it (commands in the report stay short)."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return Path(path)


def lpips_flag() -> list[str]:
    """LPIPS-AlexNet when its backbone is present; otherwise PSNR/SSIM only (the report says so)."""
    from brics_cli.nets import weights

    return [] if weights.locate("alexnet") is not None else ["--lpips-net", "none"]


def generative_weights_missing() -> str | None:
    """Why FID/IS/KID/PR/CLIP-FID/FD-DINOv2 cannot run here, or None when every weight file is present."""
    from brics_cli.nets import weights

    needed = ("inception-fidelity", "vgg16", "clip-vit-b-32", "dinov2-vit-l-14")  # FID/IS/KID, P/R, CLIP-FID, FD-DINOv2
    absent = [row["file"] for row in weights.status(verify=False) if row["name"] in needed and not row["present"]]
    if absent:
        return f"pretrained weights not present ({', '.join(sorted(set(absent)))}); see `brics weights status`"
    return None


def run_stage(stage: Stage, out: Path, env: dict[str, str]) -> None:
    """Run one stage's command, its stderr going to its log as it is written. A stop signal to the
    demo (Ctrl-C, `kill`, a scheduler) is passed on to the stage, which saves and exits; the demo
    waits for that instead of killing it (a second signal is ignored by the stage while it saves)."""
    import signal

    from brics_cli.core.signals import StopRequest

    stage.log = out / "logs" / f"{stage.name}.log"
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    if stage.optional_reason:
        stage.status = "skipped"
        return
    start = time.perf_counter()
    with open(stage.log, "w") as log, StopRequest() as stop:
        proc = subprocess.Popen([sys.executable, "-m", "brics_cli", *stage.args, "--json"], stdout=subprocess.PIPE,
                                stderr=log, text=True, env=env)
        forwarded = False
        while True:
            try:
                stdout, _ = proc.communicate(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop.requested and not forwarded:
                    proc.send_signal(getattr(signal, stop.signal_name))
                    forwarded = True
    stage.seconds = time.perf_counter() - start
    if stop.requested:
        stage.status, stage.extra["signal"] = "stopped", stop.signal_name
        return
    if proc.returncode != 0:
        stage.status = "failed"
        tail = stage.log.read_text().strip().splitlines()[-5:]
        raise BricsError(f"demo stage '{stage.name}' failed (exit {proc.returncode}): {' | '.join(tail)} -- full log {stage.log}; "
                         f"rerun `brics demo` to resume")
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    stage.result = json.loads(lines[-1]) if lines else {}
    stage.status = "done"


