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
# # Module 13: Attention
#
# > Scaled dot-product attention, multi-head attention, KV caches and their costs, in NumPy.

# %%
#| default_exp core.attention

# %%
#| export
import numpy as np

from tinytorch.core.tensor import Tensor
