"""The bundled REPA / vanilla SiT trainer and its samplers.

    loss.py      linear interpolant, v-prediction, REPA alignment term
    trainer.py   TrainConfig, train() (DDP under torchrun, exact resume, logs, analysis callbacks), export_repa
    sampler.py   Euler ODE, Euler–Maruyama SDE, classifier-free guidance on a t interval, image grids
"""
from repa_probe.train.loss import denoising_loss, repa_loss, sample_t, training_loss
from repa_probe.train.sampler import euler_maruyama, euler_ode, guided_velocity, image_grid, sample, save_grid
from repa_probe.train.trainer import TrainConfig, export_repa, init_model, train

__all__ = ["TrainConfig", "train", "export_repa", "init_model", "training_loss", "denoising_loss", "repa_loss",
           "sample_t", "sample", "euler_ode", "euler_maruyama", "guided_velocity", "image_grid", "save_grid"]
