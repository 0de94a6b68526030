"""Framework-free math of Animate124: hash grids, the 4D field, time-aware rendering, SDS, samplers, exporters.

Nothing here imports threestudio; device and dtype follow the inputs.
"""
