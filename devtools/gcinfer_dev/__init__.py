"""Development tools of gcinfer (never installed in the images): fixtures, reference oracles, container checks,
demo, previews and AutoPET scoring."""

from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
"""The source checkout this package is installed from (editable: ``make install``)."""


def container_config(container: str) -> Path:
    """``docker/<container>/config.json`` of the checkout."""
    return REPOSITORY / "docker" / container / "config.json"
