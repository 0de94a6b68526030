"""Import stand-in for libigl (threestudio.utils.ops imports three functions at module level; our code never calls
them). Install libigl==2.5.1 for the real thing."""


def _unavailable(*args, **kwargs):
    raise RuntimeError("libigl stand-in used: pip install libigl==2.5.1")


fast_winding_number_for_meshes = point_mesh_squared_distance = read_obj = _unavailable
