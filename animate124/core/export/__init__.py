"""Meshes from the field: marching cubes per time, a tracked surface, OBJ sequences and the animated glTF."""
