"""Raw primitives, kept apart from the recipes that use them: ring masks and pads, the Wegman–Carter MAC, Shamir sharing."""
