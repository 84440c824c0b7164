# Re-export of the installed package's trainers for nnU-Net's nnUNet_extTrainer lookup. No logic here:
# importing the package source from another path would create a second copy of each class.
from nnunetv2_versemi.training.variants import *  # noqa: F401,F403
