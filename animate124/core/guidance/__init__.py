"""Score distillation from frozen diffusion models: the SDS math, VAE encoding and precision, loading pretrained
parts, the video and ControlNet-Tile priors, text encoding, textual inversion, and speeding up the frozen networks
(CUDA graphs, ``torch.compile``)."""
