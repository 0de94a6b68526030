"""`pip check` for CI's pinned stack, which reuses the first venv's packages through a .pth file.

The newer releases it shadows stay visible to pip, so a package only they need (kernels, for transformers 5) is
checked against the pinned versions too. Such lines, about packages that no importable distribution requires, are
printed as leftovers of the layering and do not fail; every other line does.
"""
import subprocess
import sys

from animate124.tools.host_constraints import Requirement, canonical, default_environment, installed

check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
if check.returncode == 0:
    print("pip check: " + check.stdout.strip())
    sys.exit(0)
lines = check.stdout.splitlines()
environment = dict(default_environment(), extra="")
required = {canonical(Requirement(line).name) for dist in installed().values() for line in dist.requires or []
            if Requirement(line).marker is None or Requirement(line).marker.evaluate(environment)}
problems = [line for line in lines if line.split() and canonical(line.split()[0]) in required]
for line in lines:
    print(("pip check: " if line in problems else "pip check (layering leftover, not failed): ") + line)
sys.exit(1 if problems else 0)
