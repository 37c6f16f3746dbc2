/* Declarations for pyradiomics 3.1.0 radiomics/src/cshape.c (missing from the PyPI sdist). */
#ifndef HCC_ASSETS_PYRADIOMICS_CSHAPE_H
#define HCC_ASSETS_PYRADIOMICS_CSHAPE_H
#include <stddef.h>
int calculate_coefficients(char *mask, int *size, int *strides, double *spacing,
                           double *surfaceArea, double *volume, double *diameters);
int calculate_coefficients2D(char *mask, int *size, int *strides, double *spacing,
                             double *perimeter, double *surface, double *diameter);
#endif
