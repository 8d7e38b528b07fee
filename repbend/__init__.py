"""repbend: Representation Bending (Yousefpour et al., ACL 2025) with one model, two passes a step."""
__version__ = "0.1.0"
