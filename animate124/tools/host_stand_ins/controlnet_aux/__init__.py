"""Import stand-in for controlnet_aux (threestudio's controlnet guidance imports two detectors at module level)."""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("controlnet_aux stand-in used: pip install controlnet_aux")


class CannyDetector(_Unavailable):
    pass


class NormalBaeDetector(_Unavailable):
    pass
