"""Self-supervised pretraining: SiMo with the EqCo loss, and the baselines it is compared with."""
