"""Trainers: everything that learns before test time.

See `tta_jax.trainers.base` for the contract (`TrainContext ->
TrainResult`).
"""
