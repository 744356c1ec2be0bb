"""AE loss terms and optimisers against their formulas (paper Eq. 5, Suppl. A.2-A.3; Gulrajani et al.)."""

import pytest
import torch
from torch import nn

from brics_cli.models.discriminator import Discriminator, DiscriminatorConfig
from brics_cli.train.losses import AELossConfig, gradient_penalty, wgan_discriminator_loss, wgan_generator_loss
from brics_cli.train.optim import AEOptimConfig, build_optimizers


def test_paper_defaults():
    cfg = AELossConfig()
    assert (cfg.l2, cfg.perceptual, cfg.gp, cfg.kl) == (20.0, 5.0, 4.0, 1e-6)
    assert (cfg.perceptual_type, cfg.gan) == ("lpips-vgg", "wgan-gp")


def test_wgan_losses():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    assert wgan_discriminator_loss(real, fake).item() == -1.0 - 2.0
    assert wgan_generator_loss(fake).item() == 1.0


def test_gradient_penalty_of_a_linear_critic_is_exact():
    w = torch.randn(2, 3, 4, 4)
    critic = lambda x: (x * w[0]).flatten(1).sum(1)  # grad_x = w[0] everywhere
    gp = gradient_penalty(critic, torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4))
    torch.testing.assert_close(gp, (w[0].norm() - 1) ** 2)


def test_gradient_penalty_interpolates_per_sample_and_matches_formula():
    real, fake = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    critic = lambda x: 0.5 * x.square().flatten(1).sum(1)  # grad_x = x_hat
    torch.manual_seed(7)
    gp = gradient_penalty(critic, real, fake)
    torch.manual_seed(7)
    a = torch.rand(6, 1, 1, 1)
    x_hat = a * real + (1 - a) * fake
    torch.testing.assert_close(gp, ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean())


def test_gradient_penalty_trains_the_discriminator_through_second_order_gradients():
    torch.manual_seed(0)
    disc = Discriminator(DiscriminatorConfig(channel_base=256, channel_max=32), 16)
    gp = gradient_penalty(disc, torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    gp.backward()
    grads = [p.grad for name, p in disc.named_parameters() if "conv" in name and "weight" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_optimizers_use_the_papers_separate_eps():
    g, d = nn.Linear(2, 2), nn.Linear(2, 1)
    g_opt, d_opt = build_optimizers(AEOptimConfig(), g, d)
    assert g_opt.defaults["eps"] == 1e-15 and d_opt.defaults["eps"] == 1e-8
    assert g_opt.defaults["betas"] == (0.0, 0.99) and g_opt.defaults["lr"] == 2e-3
    assert {id(p) for p in g_opt.param_groups[0]["params"]} == {id(p) for p in g.parameters()}
    assert g_opt.param_groups[1]["params"] == []  # no grid tables in a plain module


def test_grid_lr_puts_exactly_the_grid_tables_in_their_own_group():
    from brics_cli.models.autoencoder import BRICSAutoencoder
    from brics_cli.recipe import load_recipe
    from conftest import TINY_RECIPE

    recipe = load_recipe(TINY_RECIPE, ["ae.optim.grid_lr=0.01"])
    ae = BRICSAutoencoder(recipe.ae, recipe.data.resolution)
    g_opt, _ = build_optimizers(recipe.ae.optim, ae, nn.Linear(2, 1))
    rest, tables = g_opt.param_groups
    assert tables["lr"] == 0.01 and rest["lr"] == recipe.ae.optim.lr
    assert [id(p) for p in tables["params"]] == [id(ae.retrieval.grids.tables)]
    assert len(rest["params"]) + 1 == len(list(ae.parameters()))
    # Adam's first step moves every parameter by ~lr (sign-like update): the tables by grid_lr.
    before = ae.retrieval.grids.tables.detach().clone()
    x = torch.rand(2, 3, recipe.data.resolution, recipe.data.resolution) * 2 - 1
    ae(x).recon.square().mean().backward()
    g_opt.step()
    moved = (ae.retrieval.grids.tables.detach() - before).abs()
    assert moved.max() == pytest.approx(0.01, rel=1e-3)
