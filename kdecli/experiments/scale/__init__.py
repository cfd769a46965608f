"""scale: time and error of methods against the number of keys, with fitted exponents."""
