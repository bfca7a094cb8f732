"""Evaluation: reconstruction metrics (PSNR, SSIM) and the shapes evaluator."""
