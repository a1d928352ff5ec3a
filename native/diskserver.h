/* mirror's disk server (diskserver.c): an NBD server replicating per epoch. */
#ifndef MIRROR_DISKSERVER_H
#define MIRROR_DISKSERVER_H
/* cdef-begin */
int mirror_diskserver_main(int argc, char **argv);
/* cdef-end */
#endif
