"""Import stand-ins for threestudio's GPU-only or optional host packages (see animate124.tools.host)."""
