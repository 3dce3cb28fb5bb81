"""The network and what it is saved with: DP's 1-D conditional U-Net, its normalizers, its CUDA graphs."""
