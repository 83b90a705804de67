"""Triton kernels of attnmap (plain Triton; shipped inside the wheel as attnmap.reduce.kernels)."""
