"""brics-vqgan: the VQGAN decoder (Esser et al. 2021, taming-transformers) as a BRICS decoder plugin.

Installed, it registers the decoder name `vqgan` through the `brics.decoders` entry point;
select it with `ae.decoder.name: vqgan` in a recipe.
"""

__version__ = "0.1.0"
