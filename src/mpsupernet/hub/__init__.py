"""Model cards for extracted subnets, and tiers of subnets on the Hugging Face Hub.

A *tier* is one extracted subnet, stored in a subfolder of one Hub repository; `tiers.json` at the root of that
repository lists every tier (see `manifest`). Modules by role: `cards` (rendering the cards from `templates/`),
`manifest` (`tiers.json`: schema, reading, choosing a tier), `save` (writing tiers into a folder), `push`
(publishing them in one commit), `load` (`load_subnet`).
"""

from .cards import (
    MISSING_PACKAGE_ERROR,
    card_provenance,
    render_subnet_card,
    render_supernet_card,
    render_tiers_card,
    subnet_card_template,
)
from .load import LOAD_RUNTIMES, load_subnet
from .manifest import (
    MANIFEST_FORMAT_VERSION,
    TiersManifest,
    describe_latency_measurement,
    read_tiers_manifest,
    select_tier,
    validate_tiers_manifest,
)
from .push import push_tiers
from .save import export_and_measure_tier, save_subnet_with_card, save_tiers

__all__ = [
    "LOAD_RUNTIMES",
    "MANIFEST_FORMAT_VERSION",
    "MISSING_PACKAGE_ERROR",
    "TiersManifest",
    "card_provenance",
    "describe_latency_measurement",
    "export_and_measure_tier",
    "load_subnet",
    "push_tiers",
    "read_tiers_manifest",
    "render_subnet_card",
    "render_supernet_card",
    "render_tiers_card",
    "save_subnet_with_card",
    "save_tiers",
    "select_tier",
    "subnet_card_template",
    "validate_tiers_manifest",
]
