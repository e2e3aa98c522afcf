package settler.bench;

import com.datastax.oss.driver.api.core.CqlSession;
import com.datastax.oss.driver.api.core.config.DefaultDriverOption;
import com.datastax.oss.driver.api.core.config.DriverConfigLoader;
import com.datastax.oss.driver.api.core.cql.BatchStatement;
import com.datastax.oss.driver.api.core.cql.BatchStatementBuilder;
import com.datastax.oss.driver.api.core.cql.BoundStatementBuilder;
import com.datastax.oss.driver.api.core.cql.DefaultBatchType;
import com.datastax.oss.driver.api.core.cql.PreparedStatement;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.net.InetSocketAddress;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.concurrent.Semaphore;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;

/**
 * The native ceiling of the settle benchmark: the worker's own batches (planned by
 * benchmarks/plan.py with the real Ledger and SettlementDb, dumped by benchmarks/ceiling.py)
 * fired at a fixed number in flight, phase by phase, with the values exactly as the Python
 * driver serialized them (each statement carries its own USING TIMESTAMP value).
 *
 * <p>The dump (big-endian): "SETTLERCEIL1"; u32 phases, each: name, u32 groups, each group:
 * u32 events, u32 trades, u16 batches, each: u8 type (0 LOGGED, 1 UNLOGGED), u32 length, then
 * u16 statements, each: u16 statement index, u16 values, each: i32 length (-1 null, -2 unset)
 * and the serialized value. Then u32 statements, each a text whose "{keyspace}." is replaced
 * by --keyspace. Strings are u32 length and UTF-8.
 *
 * <p>Driven over stdin/stdout by the harness, one run at a time, so that it can drop each run's
 * keyspace before the next and the JVM stays warm across runs: it prints {@code ready}, then
 * for each line {@code run LABEL KEYSPACE IN_FLIGHT all|logged} it fires every phase of the
 * dump into KEYSPACE (logged: the LOGGED batches only), printing {@code start LABEL PHASE} and
 * {@code done {json}} around each phase (the harness meters CPU in between) and {@code end
 * LABEL}; {@code quit} or the end of input ends it. Exit 1 on any failed batch.
 */
public final class NativeCeiling {
  private static final byte[] MAGIC = "SETTLERCEIL1".getBytes(StandardCharsets.US_ASCII);
  private static final int NULL_VALUE = -1;
  private static final int UNSET_VALUE = -2;
  private static final int LOGGED = 0;
  private static final String KEYSPACE_MARK = "{keyspace}.";
  private static final int MAX_IN_FLIGHT = 4096;

  /** One batch of the dump: its type and where its statements lie in the dump. */
  private record Batch(int type, int offset, int length) {}

  private record Phase(String name, long groups, long events, long trades, List<Batch> batches) {}

  private NativeCeiling() {}

  public static void main(String[] argv) throws Exception {
    Map<String, String> args = parse(argv);
    Path dump = Path.of(required(args, "dump"));
    ByteBuffer data = ByteBuffer.wrap(Files.readAllBytes(dump));
    byte[] magic = new byte[MAGIC.length];
    data.get(magic);
    if (!java.util.Arrays.equals(magic, MAGIC)) {
      throw new IllegalArgumentException(dump + ": not a ceiling dump (bad magic)");
    }
    List<Phase> phases = new ArrayList<>();
    for (int n = data.getInt(); n > 0; n--) {
      phases.add(phase(data));
    }
    List<String> texts = new ArrayList<>();
    for (int n = data.getInt(); n > 0; n--) {
      texts.add(string(data));
    }
    DriverConfigLoader config =
        DriverConfigLoader.programmaticBuilder()
            .withString(DefaultDriverOption.REQUEST_CONSISTENCY, required(args, "consistency"))
            .withDuration(DefaultDriverOption.REQUEST_TIMEOUT, Duration.ofSeconds(30))
            .withString(DefaultDriverOption.PROTOCOL_VERSION, "V4")
            .withInt(DefaultDriverOption.CONNECTION_MAX_REQUESTS, MAX_IN_FLIGHT)
            .build();
    BufferedReader commands =
        new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    try (CqlSession session =
        CqlSession.builder()
            .addContactPoint(
                new InetSocketAddress(required(args, "host"), Integer.parseInt(required(args, "port"))))
            .withLocalDatacenter(required(args, "dc"))
            .withConfigLoader(config)
            .build()) {
      say("ready");
      String line;
      while ((line = commands.readLine()) != null && !line.strip().equals("quit")) {
        String[] words = line.strip().split(" ");
        if (words.length != 5 || !words[0].equals("run")) {
          throw new IllegalArgumentException("expected: run LABEL KEYSPACE IN_FLIGHT all|logged");
        }
        String label = words[1];
        int inFlight = Integer.parseInt(words[3]);
        if (inFlight < 1 || inFlight > MAX_IN_FLIGHT) {
          throw new IllegalArgumentException("in flight: 1.." + MAX_IN_FLIGHT + ", got " + inFlight);
        }
        boolean loggedOnly = words[4].equals("logged");
        List<PreparedStatement> prepared = new ArrayList<>();
        for (String text : texts) {
          prepared.add(session.prepare(text.replace(KEYSPACE_MARK, words[2] + ".")));
        }
        for (Phase phase : phases) {
          say("start " + label + " " + phase.name());
          say("done " + fire(session, prepared, data, phase, label, inFlight, loggedOnly));
        }
        say("end " + label);
      }
    }
  }

  private static void say(String line) {
    System.out.println(line);
    System.out.flush();
  }

  /** Every batch of the phase, at most inFlight outstanding; a JSON line of what it took. */
  private static String fire(
      CqlSession session, List<PreparedStatement> prepared, ByteBuffer data, Phase phase,
      String label, int inFlight, boolean loggedOnly)
      throws InterruptedException {
    Semaphore slots = new Semaphore(inFlight);
    AtomicReference<Throwable> failure = new AtomicReference<>();
    int batches = 0;
    long started = System.nanoTime();
    for (Batch batch : phase.batches()) {
      if (loggedOnly && batch.type() != LOGGED) {
        continue;
      }
      batches++;
      slots.acquire();
      if (failure.get() != null) {
        slots.release();
        break;
      }
      session
          .executeAsync(statement(prepared, data, batch))
          .whenComplete(
              (result, error) -> {
                if (error != null) {
                  failure.compareAndSet(null, error);
                }
                slots.release();
              });
    }
    if (!slots.tryAcquire(inFlight, 300, TimeUnit.SECONDS)) {
      throw new IllegalStateException(phase.name() + ": batches still in flight after 300 s");
    }
    double elapsed = (System.nanoTime() - started) / 1e9;
    Throwable error = failure.get();
    if (error != null) {
      System.err.println("a batch failed: " + error);
      System.exit(1);
    }
    return String.format(
        Locale.ROOT,
        "{\"run\": \"%s\", \"phase\": \"%s\", \"batches\": %d, \"groups\": %d, \"events\": %d, \"trades\": %d,"
            + " \"in_flight\": %d, \"elapsed_s\": %.6f, \"batches_per_s\": %.1f,"
            + " \"events_per_s\": %.1f, \"trades_per_s\": %.1f}",
        label, phase.name(), batches, phase.groups(), phase.events(), phase.trades(), inFlight,
        elapsed, batches / elapsed, phase.events() / elapsed, phase.trades() / elapsed);
  }

  /** The batch as a driver statement: each value bound as the serialized bytes it was. */
  private static BatchStatement statement(
      List<PreparedStatement> prepared, ByteBuffer data, Batch batch) {
    ByteBuffer body = data.duplicate();
    body.position(batch.offset()).limit(batch.offset() + batch.length());
    BatchStatementBuilder builder =
        BatchStatement.builder(batch.type() == LOGGED ? DefaultBatchType.LOGGED : DefaultBatchType.UNLOGGED);
    for (int statements = Short.toUnsignedInt(body.getShort()); statements > 0; statements--) {
      BoundStatementBuilder bound = prepared.get(Short.toUnsignedInt(body.getShort())).boundStatementBuilder();
      int values = Short.toUnsignedInt(body.getShort());
      for (int i = 0; i < values; i++) {
        int length = body.getInt();
        if (length == NULL_VALUE) {
          bound.setBytesUnsafe(i, null);
        } else if (length != UNSET_VALUE) {
          ByteBuffer value = body.slice(body.position(), length);
          body.position(body.position() + length);
          bound.setBytesUnsafe(i, value);
        }
      }
      builder.addStatement(bound.build());
    }
    return builder.build();
  }

  private static Phase phase(ByteBuffer data) {
    String name = string(data);
    long groups = Integer.toUnsignedLong(data.getInt());
    long events = 0;
    long trades = 0;
    List<Batch> batches = new ArrayList<>();
    for (long g = 0; g < groups; g++) {
      events += Integer.toUnsignedLong(data.getInt());
      trades += Integer.toUnsignedLong(data.getInt());
      for (int b = Short.toUnsignedInt(data.getShort()); b > 0; b--) {
        int type = data.get();
        int length = data.getInt();
        batches.add(new Batch(type, data.position(), length));
        data.position(data.position() + length);
      }
    }
    return new Phase(name, groups, events, trades, batches);
  }

  private static String string(ByteBuffer data) {
    byte[] bytes = new byte[data.getInt()];
    data.get(bytes);
    return new String(bytes, StandardCharsets.UTF_8);
  }

  private static Map<String, String> parse(String[] argv) {
    Map<String, String> args = new HashMap<>();
    for (int i = 0; i < argv.length; i++) {
      if (!argv[i].startsWith("--")) {
        throw new IllegalArgumentException("unexpected argument: " + argv[i]);
      }
      String key = argv[i].substring(2);
      if (i + 1 < argv.length) {
        args.put(key, argv[++i]);
      } else {
        throw new IllegalArgumentException("--" + key + ": needs a value");
      }
    }
    return args;
  }

  private static String required(Map<String, String> args, String key) {
    String value = args.get(key);
    if (value == null) {
      throw new IllegalArgumentException("--" + key + " is required");
    }
    return value;
  }
}
