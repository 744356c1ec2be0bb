"""Every decoder trains through `ae-train`'s step: the built-in `stylegan` and the `vqgan` / `movq`
plugins overfit four real 32x32 crops (L2 only, relaxed precision on, EMA off) to a stated PSNR."""

from __future__ import annotations

import pytest
import torch

from brics_cli.recipe import load_recipe
from brics_cli.train.ae import AETrainer
from brics_cli.core.runtime import Runtime
from conftest import TINY_RECIPE
from test_autoencoder import _real_crops

DECODERS = {
    "stylegan": [],
    "vqgan": ["ae.decoder.name=vqgan", "ae.decoder.ch=32", "ae.decoder.ch_mult=[1,1,1]", "ae.decoder.num_res_blocks=1",
              "ae.decoder.attn_resolutions=[8]"],
    "movq": ["ae.decoder.name=movq", "ae.decoder.ch=32", "ae.decoder.ch_mult=[1,1,1]", "ae.decoder.num_res_blocks=1",
             "ae.decoder.attn_resolutions=[8]"],
}
TARGET_DB = 23.0
STEPS = 300


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_decoder_overfits_four_real_crops(decoder, tmp_path):
    recipe = load_recipe(TINY_RECIPE, ["data.shards=unused", "ae.loss.gan=none", "ae.optim.betas=[0.9,0.99]",
                                       *DECODERS[decoder]])
    torch.manual_seed(0)
    trainer = AETrainer(recipe, tmp_path, Runtime(torch.device("cpu")))
    x = _real_crops(4, 32)
    first = None
    psnr = 0.0
    for step in range(1, STEPS + 1):
        terms = trainer.train_step([x])
        first = first if first is not None else terms["l2"]
        if step % 25 == 0:
            trainer.ae.eval()
            with torch.no_grad():
                mse = (trainer.ae(x).recon.clamp(-1, 1) - x).square().mean()
            trainer.ae.train()
            psnr = max(psnr, 10 * torch.log10(4 / mse).item())
            if psnr >= TARGET_DB:
                break
    assert terms["l2"] < 0.25 * first, (first, terms["l2"])
    assert psnr >= TARGET_DB, f"{decoder}: {psnr:.2f} dB after {step} steps"
