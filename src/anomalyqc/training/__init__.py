"""One training loop for the detectors learnt by gradient descent (GANomaly, DRAEM, GRD-Net,
ResGANAD): epochs, validation, schedules, augmentation, checkpoints and resume, mixed
precision, several processes. The embedding detectors need none of it."""

from anomalyqc.training.augment import augment_batch
from anomalyqc.training.config import TrainConfig
from anomalyqc.training.curves import loss_curves_figure, plot_loss_curves
from anomalyqc.training.interface import OptimGroup, StepContext, Trainable
from anomalyqc.training.schedules import CosineRestarts, Plateau, Schedule
from anomalyqc.training.trainer import Trainer, TrainResult

__all__ = ["CosineRestarts", "OptimGroup", "Plateau", "Schedule", "StepContext", "TrainConfig",
           "TrainResult", "Trainable", "Trainer", "augment_batch", "loss_curves_figure",
           "plot_loss_curves"]
