"""Built-in rewards, one self-contained file each; every module here is imported by the registry."""
