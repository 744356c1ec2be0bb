"""CUDA checks (skipped, and reported as skipped, on machines without a GPU; CI has none)."""

import pytest
import torch

from brics_cli.models.grid import GridConfig
from brics_cli.models.retrieval import FeatureRetrieval, MLPConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("interpolation", ["gather", "separable"])
@pytest.mark.parametrize("retrieval", ["grid", "hash"])
def test_retrieval_on_cuda_matches_cpu(interpolation, retrieval):
    torch.manual_seed(0)
    grid = GridConfig(levels=16, r_min=16, r_max=64, retrieval=retrieval, interpolation=interpolation)
    cpu = FeatureRetrieval(grid, MLPConfig(), groups=4, key_channels=1, r_max=64, channels=512)
    gpu = FeatureRetrieval(grid, MLPConfig(), groups=4, key_channels=1, r_max=64, channels=512).cuda()
    gpu.load_state_dict(cpu.state_dict())
    z = torch.rand(2, 4, 64, 64)
    outs, grads = [], []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        zz = z.to(device).requires_grad_(True)
        f = module(zz)
        f.square().mean().backward()
        outs.append(f.detach().cpu())
        grads.append((zz.grad.cpu(), module.grids.tables.grad.cpu()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-9)


@cuda
def test_grids_stay_fp32_under_cuda_autocast():
    grid = GridConfig(levels=4, r_min=4, r_max=16, log2_table_size=10)
    retrieval = FeatureRetrieval(grid, MLPConfig(hidden=8), groups=2, key_channels=1, r_max=16, channels=16).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        raw = retrieval.retrieve(torch.rand(2, 2, 8, 8, device="cuda"))
    assert raw.dtype == torch.float32


@cuda
def test_decoder_inference_path_on_cuda_matches_cpu_training_path():
    from brics_cli.models.decoder import StyleGANDecoder, StyleGANDecoderConfig

    torch.manual_seed(0)
    cpu = StyleGANDecoder(StyleGANDecoderConfig(channel_base=256), 32, 8, 32).eval()
    gpu = StyleGANDecoder(StyleGANDecoderConfig(channel_base=256), 32, 8, 32).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    f = torch.randn(2, 32, 8, 8)
    expected = cpu(f).detach()  # autograd on: the training path
    with torch.no_grad():
        got = gpu(f.cuda()).cpu()  # the inference path (channels-last, shared-weight convs)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-4)
