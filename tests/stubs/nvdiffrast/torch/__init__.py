"""Import stand-in for nvdiffrast.torch so `import threestudio` works on CPU (tests only; never called)."""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("nvdiffrast stand-in used: tests must not rasterise")


class RasterizeGLContext(_Unavailable):
    pass


class RasterizeCudaContext(_Unavailable):
    pass
