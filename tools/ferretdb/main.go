// Command ferretdb-aioflow runs FerretDB (SQLite handler, embedded as a Go library) for aioflow's
// MongoDB backend tests. It is built and started by tests/servers/ferretdb.py; it is not part
// of the library.
//
//	ferretdb-aioflow -listen 127.0.0.1:PORT -data DIR
//
// serves the MongoDB wire protocol on the TCP address until SIGTERM or SIGINT.
//
// Why a front: FerretDB v1.24's SQLite handler runs an update (update, findAndModify) as "read
// the matching documents, change them in Go, write them back by _id", with no isolation between
// concurrent commands. Two clients can both match the same document in a conditional update and
// both "win" (a lost update), which MongoDB never allows: a single-document write is atomic in
// MongoDB. The aioflow backend relies on exactly that guarantee and on nothing more. So the
// embedded FerretDB listens on a private loopback port, and this program accepts the clients
// and forwards every request and its reply to it one at a time (-serialize, the default),
// which restores MongoDB's single-document atomicity. -serialize=false forwards without the
// global lock (to show the difference).
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/FerretDB/FerretDB/ferretdb"
)

const (
	opMsg          = 2013
	flagMoreToCome = 1 << 1
	maxMessage     = 48 << 20
	upstreamWait   = 30 * time.Second
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to serve clients on")
	data := flag.String("data", "", "directory for the SQLite databases (created if missing)")
	serialize := flag.Bool("serialize", true, "run one command at a time (see the package doc)")
	logLevel := flag.String("log-level", "error", "FerretDB log level: debug, info, warn or error")
	synchronous := flag.String("synchronous", "NORMAL",
		"SQLite synchronous mode: NORMAL (durable against process crashes; the default for "+
			"a test server) or FULL (an fsync per write, durable against power loss)")
	flag.Parse()

	if *data == "" {
		fail(2, "-data DIR is required")
	}
	dir, err := filepath.Abs(*data)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		fail(2, "cannot use data directory %q: %v", *data, err)
	}
	if *synchronous != "NORMAL" && *synchronous != "FULL" {
		fail(2, "bad -synchronous %q: NORMAL or FULL", *synchronous)
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fail(2, "bad -log-level %q: %v", *logLevel, err)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	front, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(1, "cannot listen on %s: %v", *listen, err)
	}
	// The embedded server gets a private port next to ours.
	probe, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(1, "cannot pick a private port: %v", err)
	}
	inner := probe.Addr().String()
	probe.Close()

	db, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: inner},
		Logger:    logger,
		Handler:   "sqlite",
		SQLiteURL: "file:" + dir + "/?_pragma=synchronous(" + *synchronous + ")",
	})
	if err != nil {
		fail(1, "%v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	done := make(chan error, 1)
	go func() { done <- db.Run(ctx) }()

	p := &proxy{upstream: inner, serialize: *serialize}
	go func() {
		<-ctx.Done()
		front.Close()
	}()
	fmt.Fprintf(os.Stderr, "ferretdb-aioflow: serving mongodb://%s/ (serialize=%v)\n",
		front.Addr(), *serialize)
	p.serve(ctx, front)
	if err := <-done; err != nil {
		fail(1, "%v", err)
	}
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, "ferretdb-aioflow: "+format+"\n", args...)
	os.Exit(code)
}

type proxy struct {
	upstream  string
	serialize bool
	turn      sync.Mutex // held from sending a request upstream until its reply is read
}

func (p *proxy) serve(ctx context.Context, l net.Listener) {
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		go p.handle(ctx, conn)
	}
}

// handle relays one client connection over its own upstream connection (cursors and
// sessions stay per connection), request by request.
func (p *proxy) handle(ctx context.Context, client net.Conn) {
	defer client.Close()
	var up net.Conn
	var err error
	deadline := time.Now().Add(upstreamWait)
	for { // the embedded server may still be starting
		up, err = net.Dial("tcp", p.upstream)
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		return
	}
	defer up.Close()
	go func() {
		<-ctx.Done()
		client.Close()
		up.Close()
	}()
	for {
		request, err := readMessage(client)
		if err != nil {
			return
		}
		if err := p.exchange(up, client, request); err != nil {
			return
		}
	}
}

// exchange sends one request upstream and relays its reply (or replies, for an exhaust
// stream) to the client, holding the global turn when serializing.
func (p *proxy) exchange(up, client net.Conn, request []byte) error {
	if p.serialize {
		p.turn.Lock()
		defer p.turn.Unlock()
	}
	if _, err := up.Write(request); err != nil {
		return err
	}
	if moreToCome(request) { // a fire-and-forget request: no reply follows
		return nil
	}
	for {
		reply, err := readMessage(up)
		if err != nil {
			return err
		}
		if _, err := client.Write(reply); err != nil {
			return err
		}
		if !moreToCome(reply) { // an exhaust reply with moreToCome is followed by another
			return nil
		}
	}
}

// moreToCome reports an OP_MSG with the moreToCome flag: on a request, no reply follows; on a
// reply, another reply follows.
func moreToCome(message []byte) bool {
	if binary.LittleEndian.Uint32(message[12:16]) != opMsg {
		return false
	}
	return binary.LittleEndian.Uint32(message[16:20])&flagMoreToCome != 0
}

func readMessage(r io.Reader) ([]byte, error) {
	var header [16]byte
	if _, err := io.ReadFull(r, header[:]); err != nil {
		return nil, err
	}
	size := int(int32(binary.LittleEndian.Uint32(header[0:4])))
	if size < 20 || size > maxMessage {
		return nil, fmt.Errorf("bad message length %d", size)
	}
	message := make([]byte, size)
	copy(message, header[:])
	if _, err := io.ReadFull(r, message[16:]); err != nil {
		return nil, err
	}
	return message, nil
}
