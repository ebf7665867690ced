# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Module 02: Tensor
#
# > The NumPy-backed Tensor that every later module builds on.

# %%
#| default_exp core.tensor

# %%
#| export
import numpy as np


class Tensor:
    def __init__(self, data, dtype=None):
        self.data = np.asarray(data, dtype=dtype or np.float32)
