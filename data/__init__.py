"""Image sets: image folders, the embedded Mars crater set and its builder, procedural craters."""
