"""gcinfer: Grand Challenge inference for AMOS 2022 (nnU-Net v1 ensembles) and AutoPET II (MONAI DynUNet).

Axis conventions used throughout the library:

- numpy arrays read from images are (z, y, x), as SimpleITK's ``GetArrayFromImage`` returns them;
- tensors fed to the tiling engine are channel-first ``(C, *spatial)``; the spatial order is whatever the
  pipeline's network was trained on (nnU-Net v1: the plans' transposed (z, y, x); MONAI: (x, y, z)).
"""

__version__ = "0.1.0"
