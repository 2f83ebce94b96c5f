"""Where instances come from and go to: one subpackage per kind of end."""
