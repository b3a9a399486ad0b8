"""The study's 2D segmentation networks (ver1-ver5), built by name through the registry.

    from ctseg.networks import build_network
    model = build_network("unet_mcnet", in_channels=1, out_channels=1)
    study = build_network("unet_mcnet", in_channels=3, out_channels=1, variant="thesis")

See docs/networks.md for each block, its diagram and its source.
"""

from ctseg.networks.registry import build_network, list_networks

__all__ = ["build_network", "list_networks"]
