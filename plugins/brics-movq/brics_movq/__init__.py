"""brics-movq: the MoVQ decoder (Zheng et al. 2022) as a BRICS decoder plugin.

MoVQ is the VQGAN decoder whose GroupNorms are spatially conditioned on the decoder input
(SpatialNorm). Installed, it registers the decoder name `movq` through the `brics.decoders`
entry point; select it with `ae.decoder.name: movq` in a recipe.
"""

__version__ = "0.1.0"
