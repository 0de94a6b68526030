"""Import stand-in for IPython.display.clear_output (threestudio's zero123 LDM guidance imports it)."""


def clear_output(*args, **kwargs):
    pass
