"""Import stand-in for nvdiffrast.torch so `import threestudio` works on CPU (tests and `animate124 launch-cpu`; never called)."""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("nvdiffrast stand-in used: a host feature that rasterises needs the real nvdiffrast")


class RasterizeGLContext(_Unavailable):
    pass


class RasterizeCudaContext(_Unavailable):
    pass
