/* rr: 1-byte TCP request/response over one persistent connection (TCP_NODELAY),
 * and crr: connect, 1 byte each way, close (the server closes first, or with
 * -X the client: netperf's TCP_CRR order).
 *
 *   rr -s [-p PORT]                       server: echo one byte per request; a request
 *                                          byte 'C' is echoed and then the server closes
 *                                          the connection (CRR: TIME_WAIT stays on the
 *                                          server, so client ports do not run out)
 *   rr -c HOST [-p PORT] [-t SEC] [-w SEC] client: ping-pong for SEC seconds after
 *                                          a warm-up of -w seconds, then print JSON:
 *   {"transactions":N,"seconds":S,"tps":T,"p50_us":A,"p99_us":B,"mean_us":C}
 *   rr -C HOST [-p PORT] [-t SEC] [-w SEC] CRR client: one connection per transaction
 *                                          (connect, send 'C', read 1 byte, wait for the
 *                                          server's FIN, close), then print JSON:
 *   {"connections":N,"seconds":S,"cps":R,"p50_us":A,"p99_us":B,"mean_us":C}
 *   rr -X HOST [-p PORT] [-t SEC] [-w SEC] CRR client that closes first (sends 'c',
 *                                          reads 1 byte, closes; the server sees EOF
 *                                          and closes): TIME_WAIT stays on the client,
 *                                          which then needs net.ipv4.tcp_tw_reuse=1
 *                                          to find free ports; same JSON as -C.
 *
 * Latency is measured per transaction with CLOCK_MONOTONIC into a histogram of
 * 100 ns buckets (up to 50 ms; slower ones count in the last bucket).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKET_NS 100
#define NBUCKETS (50 * 1000 * 1000 / BUCKET_NS)

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "rr: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void nodelay(int fd)
{
	int one = 1;
	if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
		die("TCP_NODELAY");
}

static int full_io(int fd, char *b, int write_it)
{
	for (;;) {
		ssize_t n = write_it ? write(fd, b, 1) : read(fd, b, 1);
		if (n == 1)
			return 0;
		if (n == 0)
			return -1;
		if (errno != EINTR)
			return -1;
	}
}

static __attribute__((noreturn)) void serve(int port)
{
	int one = 1;
	int ls = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};

	if (ls < 0)
		die("socket");
	setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(ls, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	if (listen(ls, 16) < 0)
		die("listen");
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		char b;
		int fd = accept(ls, NULL, NULL);
		if (fd < 0) {
			if (errno == EINTR)
				continue;
			die("accept");
		}
		nodelay(fd);
		while (full_io(fd, &b, 0) == 0 && full_io(fd, &b, 1) == 0 && b != 'C')
			;
		close(fd);
	}
}

static void report(const uint32_t *hist, uint64_t n, uint64_t sum, double measured, int crr)
{
	double p50 = 0, p99 = 0;
	uint64_t acc = 0, want50 = (n + 1) / 2, want99 = n - n / 100;
	int got50 = 0;
	for (uint64_t k = 0; k < NBUCKETS && n; k++) {
		acc += hist[k];
		if (!got50 && acc >= want50) {
			p50 = (k + 0.5) * BUCKET_NS / 1000.0;
			got50 = 1;
		}
		if (acc >= want99) {
			p99 = (k + 0.5) * BUCKET_NS / 1000.0;
			break;
		}
	}
	printf("{\"%s\":%llu,\"seconds\":%.3f,\"%s\":%.1f,\"p50_us\":%.1f,"
	       "\"p99_us\":%.1f,\"mean_us\":%.2f}\n",
	       crr ? "connections" : "transactions", (unsigned long long)n, measured,
	       crr ? "cps" : "tps", n / measured, p50, p99, n ? sum / 1000.0 / n : 0.0);
}

static int parse_addr(const char *host, int port, struct sockaddr_in *a)
{
	memset(a, 0, sizeof(*a));
	a->sin_family = AF_INET;
	a->sin_port = htons(port);
	if (inet_pton(AF_INET, host, &a->sin_addr) != 1) {
		fprintf(stderr, "rr: %s is not an IPv4 address\n", host);
		return -1;
	}
	return 0;
}

/* one connection per transaction; the server closes first, or the client
 * (client_first) */
static int crr_client(const char *host, int port, double secs, double warm, int client_first)
{
	struct sockaddr_in a;
	uint32_t *hist = calloc(NBUCKETS, sizeof(*hist));
	uint64_t n = 0, sum = 0, warm_end, end, t0, t1;
	char b;

	if (!hist)
		die("calloc");
	if (parse_addr(host, port, &a))
		return 1;
	t1 = now_ns();
	warm_end = t1 + (uint64_t)(warm * 1e9);
	end = warm_end + (uint64_t)(secs * 1e9);
	do {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		t0 = t1;
		if (fd < 0)
			die("socket");
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
			die("connect");
		b = client_first ? 'c' : 'C';
		if (full_io(fd, &b, 1) || full_io(fd, &b, 0)) {
			fprintf(stderr, "rr: crr transaction failed\n");
			return 1;
		}
		/* server first: wait for its FIN so that TIME_WAIT stays on the server */
		while (!client_first && read(fd, &b, 1) < 0 && errno == EINTR)
			;
		close(fd);
		t1 = now_ns();
		if (t0 >= warm_end) {
			uint64_t d = t1 - t0, k = d / BUCKET_NS;
			hist[k < NBUCKETS ? k : NBUCKETS - 1]++;
			sum += d;
			n++;
		}
	} while (t1 < end);
	report(hist, n, sum, (double)(t1 - warm_end) / 1e9, 1);
	free(hist);
	return 0;
}

static int client(const char *host, int port, double secs, double warm)
{
	struct sockaddr_in a;
	uint32_t *hist = calloc(NBUCKETS, sizeof(*hist));
	uint64_t n = 0, sum = 0, start, warm_end, end, t0, t1;
	int fd = -1;
	char b = 'x';

	if (!hist)
		die("calloc");
	if (parse_addr(host, port, &a))
		return 1;
	/* the server may still be starting: retry for up to 3 s */
	for (int i = 0; i < 300; i++) {
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0)
			die("socket");
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
			break;
		close(fd);
		fd = -1;
		usleep(10000);
	}
	if (fd < 0)
		die("connect");
	nodelay(fd);

	start = now_ns();
	warm_end = start + (uint64_t)(warm * 1e9);
	end = warm_end + (uint64_t)(secs * 1e9);
	t1 = start;
	do {
		t0 = t1;
		if (full_io(fd, &b, 1) || full_io(fd, &b, 0)) {
			fprintf(stderr, "rr: connection lost\n");
			return 1;
		}
		t1 = now_ns();
		if (t0 >= warm_end) {
			uint64_t d = t1 - t0, k = d / BUCKET_NS;
			hist[k < NBUCKETS ? k : NBUCKETS - 1]++;
			sum += d;
			n++;
		}
	} while (t1 < end);
	close(fd);

	report(hist, n, sum, (double)(t1 - warm_end) / 1e9, 0);
	free(hist);
	return 0;
}

int main(int argc, char **argv)
{
	int opt, port = 7001, server = 0, crr = 0, client_first = 0;
	const char *host = NULL;
	double secs = 3, warm = 1;

	signal(SIGPIPE, SIG_IGN);
	while ((opt = getopt(argc, argv, "sc:C:X:p:t:w:")) != -1) {
		switch (opt) {
		case 's': server = 1; break;
		case 'c': host = optarg; break;
		case 'C': host = optarg; crr = 1; break;
		case 'X': host = optarg; crr = 1; client_first = 1; break;
		case 'p': port = atoi(optarg); break;
		case 't': secs = atof(optarg); break;
		case 'w': warm = atof(optarg); break;
		default:
			fprintf(stderr, "usage: rr -s [-p PORT] | rr -c|-C|-X HOST [-p PORT] [-t SEC] [-w SEC]\n");
			return 2;
		}
	}
	if (server)
		serve(port);
	if (!host) {
		fprintf(stderr, "rr: need -s, -c HOST, -C HOST or -X HOST\n");
		return 2;
	}
	return crr ? crr_client(host, port, secs, warm, client_first) : client(host, port, secs, warm);
}
