"""Import stand-in for tinycudann so that `import threestudio` works on a CPU machine (tests and `animate124 launch-cpu`).

threestudio imports tinycudann at module level; our own components never call it. A host feature that builds
one of these classes needs the real package, so they raise with that fix.
"""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("tinycudann stand-in used: our components never build tinycudann modules (a host feature that needs them needs the real package)")


class Encoding(_Unavailable):
    pass


class Network(_Unavailable):
    pass


class NetworkWithInputEncoding(_Unavailable):
    pass


def free_temporary_memory():
    pass
