"""The bundled REPA / vanilla SiT trainer.

    loss.py      linear interpolant, v-prediction, REPA alignment term
    trainer.py   TrainConfig, train() (DDP under torchrun, exact resume, logs, analysis callbacks), export_repa
(Sampling lives in repa_probe/sampler.py: it serves analysis as well as training.)
"""
from repa_probe.train.loss import denoising_loss, repa_loss, sample_t, training_loss
from repa_probe.train.trainer import TrainConfig, export_repa, init_model, train

__all__ = ["TrainConfig", "train", "export_repa", "init_model", "training_loss", "denoising_loss", "repa_loss",
           "sample_t"]
