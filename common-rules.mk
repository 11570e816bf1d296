# Included by every Makefile.am.
AM_CPPFLAGS = \
	-I$(top_srcdir)/common/utils \
	-I$(top_srcdir)/common/bitmap \
	-I$(top_srcdir)/common/json \
	-I$(top_srcdir)/common/store \
	$(NULL)
AM_CFLAGS = $(WARNINGS_CFLAGS) $(PTHREAD_CFLAGS) $(SANITIZER_CFLAGS)
AM_LDFLAGS = $(SANITIZER_LDFLAGS)
