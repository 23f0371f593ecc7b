"""The 3D world of the phantom: chest CT volumes in HU, their findings, reports and dataset layouts."""
