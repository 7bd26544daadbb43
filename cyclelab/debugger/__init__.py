"""Layer 5, debugger: a generation single-stepped like a CPU debugger. The session (:class:`Debugger`),
its state and timeline, the views and the widget, the offline replay page and the probability shading."""
