"""Evaluation: mIoU protocols, prediction on image files and the plots of a run."""
