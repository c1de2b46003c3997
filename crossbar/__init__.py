"""Arrays of devices as weight matrices: periphery, pulsed updates, `AnalogProjection`."""
