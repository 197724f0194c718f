"""The bundled demo: a synthetic shapes data set (``paddlemix_vl2.demo.shapes``) for a small model to learn."""
