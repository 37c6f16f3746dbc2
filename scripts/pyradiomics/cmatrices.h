/* Declarations for pyradiomics 3.1.0 radiomics/src/cmatrices.c.
   The 3.1.0 source distribution on PyPI ships the .c files without their headers;
   scripts/install_pyradiomics.sh adds these before building. */
#ifndef HCC_ASSETS_PYRADIOMICS_CMATRICES_H
#define HCC_ASSETS_PYRADIOMICS_CMATRICES_H
int calculate_glcm(int *image, char *mask, int *size, int *bb, int *strides, int *angles, int Na, int Nd, double *glcm, int Ng);
int calculate_glszm(int *image, char *mask, int *size, int *bb, int *strides, int *angles, int Na, int Nd, int *tempData, int Ng, int Ns, int Nvox);
int fill_glszm(int *tempData, double *glszm, int Ng, int maxRegion);
int calculate_glrlm(int *image, char *mask, int *size, int *bb, int *strides, int *angles, int Na, int Nd, double *glrlm, int Ng, int Nr);
int calculate_ngtdm(int *image, char *mask, int *size, int *bb, int *strides, int *angles, int Na, int Nd, double *ngtdm, int Ng);
int calculate_gldm(int *image, char *mask, int *size, int *bb, int *strides, int *angles, int Na, int Nd, double *gldm, int Ng, int alpha);
int get_angle_count(int *size, int *distances, int Nd, int Ndist, char bidirectional, int force2Ddim);
int build_angles(int *size, int *distances, int Nd, int Ndist, int force2Ddim, int Na, int *angles);
#endif
