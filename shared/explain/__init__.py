"""Explanations for ``site predict --explain``: one heatmap per view of every scored unit.

* :mod:`.heatmap`: :class:`ViewHeatmap`, what a family's ``Task.explain`` yields;
* :mod:`.cam`: Grad-CAM and Grad-CAM++ through pytorch-grad-cam, for any of our networks;
* :mod:`.render`: PNG overlays and DICOM Secondary Capture objects a PACS viewer opens;
* :mod:`.pointing`: does a heatmap point at the outlined lesion (pointing game, energy inside)?

Heatmaps, like predictions.csv, hold the site's images and local ids: they never leave the site.
"""

from __future__ import annotations

from .heatmap import ViewHeatmap

__all__ = ["ViewHeatmap"]
