"""Meshes from the field: marching cubes per time and a tracked surface (mesh_export), the OBJ sequence and the
animated glTF (writers), and their distance to a known surface (fidelity)."""
