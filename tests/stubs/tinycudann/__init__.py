"""Import stand-in for tinycudann so that `import threestudio` works on a CPU machine (tests only).

threestudio imports tinycudann at module level; our own components never call it. Using any of these classes
is a test bug, so they raise.
"""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("tinycudann stand-in used: tests must not build tinycudann modules")


class Encoding(_Unavailable):
    pass


class Network(_Unavailable):
    pass


class NetworkWithInputEncoding(_Unavailable):
    pass


def free_temporary_memory():
    pass
