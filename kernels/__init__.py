"""Fast paths for the hot loops (installed as gsa_rag.kernels).

Each kernel sits beside its torch reference; the references for selection and masks live in
gsa_rag.selection and gsa_rag.masks until a kernel replaces them on CUDA.
"""
