"""nnU-Net trainer classes; nnU-Net imports the modules here by file, see hcc_cpu_trainer."""
