"""Physics of one resistive device, vectorised: configs with aihwkit's names, pulse responses, presets."""
